"""Inference: one pipeline base and the task pipelines (text -> image, image -> text, image -> image), and image I/O."""
