"""The digits wing: the toy data sets on scikit-learn's 8x8 digits (`data`) and the judges of the shipped presets
(`eval`). Inference never imports it."""
