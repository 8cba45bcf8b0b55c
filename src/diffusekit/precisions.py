"""The names of the compute paths, kept free of torch so that building the CLI parser stays fast."""

from __future__ import annotations

# generation: see runtime.choose_path for what each one runs and when "auto" picks it
PRECISIONS = ("auto", "fp32", "fp32-fast", "bf16", "fp16", "int8", "openvino", "openvino-int8")
# the U-Net through the optional OpenVINO backend (accel/openvino_backend.py)
OPENVINO_PRECISIONS = ("openvino", "openvino-int8")
# training: see train.loop
TRAIN_PRECISIONS = ("auto", "bf16", "fp32")
