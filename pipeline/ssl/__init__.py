"""Self-supervised pretraining (DINOv2-style) of timm ViTs."""
