"""Frozen parts loaded from elsewhere: the text encoders (CLIP, T5, BERT/MiniLM), the T5 caption cleaner and the
autoencoders (identity, SD VAE)."""
