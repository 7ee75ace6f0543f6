"""Optional feature extractors: raw text and IMU samples -> the ``[tokens, token_dim]`` features an edge expects.

They run exported ONNX models on onnxruntime, and the text encoder tokenizes with ``tokenizers``: install
``megace-device-sdk[extractors]`` and build the files with ``megace extractors build --out DIR`` (where
torch is). Nothing here imports onnxruntime or tokenizers until an extractor is opened, so
``import device_sdk`` stays as light as before.

    text = TextEncoder.open(DIR)                    # [tokens, 384], register text.profile()
    imu = ImuFrontEnd.open(DIR)                     # {"accel": [10, 30], "gyro": [10, 30]} from [100, 6]
    record = FeatureRecord(device, n, {"text": text.encode("door left open"), **imu(raw)})
"""

from device_sdk.extractors.bundle import (
    ExtractorDependencyError,
    ExtractorError,
    ExtractorFileError,
    ExtractorInputError,
    read_manifest,
)
from device_sdk.extractors.imu import ImuFrontEnd
from device_sdk.extractors.text import TextEncoder

__all__ = [
    "ExtractorDependencyError",
    "ExtractorError",
    "ExtractorFileError",
    "ExtractorInputError",
    "ImuFrontEnd",
    "TextEncoder",
    "read_manifest",
]
