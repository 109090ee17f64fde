from torchvision._placeholders import InterpolationMode, module_getattr as __getattr__  # noqa: F401
