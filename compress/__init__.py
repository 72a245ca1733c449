"""Compression passes over zoo models: quantization, sparsity and pruning, distillation, BN folding and
re-parameterization, each a pure function of parameters (or a train-loop hook) that leaves the model an ordinary one.
"""
