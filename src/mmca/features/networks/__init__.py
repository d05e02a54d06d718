"""The ImageNet CNNs the image backbones are built on, defined here (torchvision does not import
beside the CPU torch build) with module names that follow each shipped checkpoint's keys, so
the weights load with `strict=True`. Each network gives `trunk()`: images -> last feature map."""
