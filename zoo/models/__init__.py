"""Model families. Importing this package registers every family (the registry is always complete)."""

from zoo.models import efficientnet, mobilenetv2, mobilenetv3, mobilevit  # noqa: F401
