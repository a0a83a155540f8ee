"""MTCNN face detection and 5-point alignment, faithful to the reference AdaFace pipeline.

``MTCNN(device).detect(rgb) -> Detections`` finds every face; ``align(rgb, landmarks)`` cuts the
112×112 crop a face-recognition network expects.
"""
from .align import CROP_SIZE, TEMPLATE, AlignmentError, align, similarity_matrix
from .detector import MTCNN, Detections, DetectorParams

__all__ = ["MTCNN", "Detections", "DetectorParams", "align", "similarity_matrix", "AlignmentError",
           "TEMPLATE", "CROP_SIZE"]
