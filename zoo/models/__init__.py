"""Model families. Importing this package imports every module in it (one file per family, plus the shared backbone,
heads and MobileNet builder), and each family file registers its models: the registry is always complete, and a new
family file needs no edit elsewhere."""

import importlib
import pkgutil

for _info in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_info.name}")
