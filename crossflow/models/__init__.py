"""The trained networks: the CrossFlow model, its flow networks (DiT, DiMR), the Text/Image VEs and the caption
decoder. Knows no data set, pipeline, trainer or converter."""
