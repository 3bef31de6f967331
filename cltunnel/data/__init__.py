"""Data: datasets as uint8 tensors (npz directory or torchvision), class splits into tasks (scenarios), and
the device data path (images on the training device, augmented and normalised there)."""
