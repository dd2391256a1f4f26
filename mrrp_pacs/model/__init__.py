"""MRRP multimodal survival model: fusion network, Cox loss, training and evaluation."""
