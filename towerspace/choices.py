"""The allowed values of the block's, models' and trainer's string options (no torch: the
command line builds its help from them)."""

ORDERS: tuple[str, ...] = ("spatial_first", "pointwise_first")  # which conv comes first
MIDS: tuple[str, ...] = ("none", "relu", "elu", "bn", "bn_relu")  # between the two convs
MATCHES: tuple[str, ...] = ("none", "params", "flops")  # what budget matching holds equal
# an experiment's model.match: also latency, the step time measured on the trial's device
BUDGETS: tuple[str, ...] = (*MATCHES, "latency")
# imagenet: two unpadded 3×3 convs, the first strided; small: padded, stride 1
STEMS: tuple[str, ...] = ("imagenet", "small")
# Xception's strided max-pools: torch pads 1 on every side (timm, Cadene); keras pads as Keras'
# "same" does, the odd pixel of an even input at the bottom and right only
POOL_PADDINGS: tuple[str, ...] = ("torch", "keras")
DEVICES: tuple[str, ...] = ("auto", "cpu", "cuda")  # auto: CUDA where there is one
EXPORT_FORMATS: tuple[str, ...] = ("onnx", "pt2")  # onnx: an ONNX file; pt2: torch.export's
