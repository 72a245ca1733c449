"""Pretrained weights: sources, downloads, torch-free checkpoint reading, conversion."""
