"""Model families. Importing this package registers every family (the registry is always complete)."""

from zoo.models import efficientnet, levit, mobilenetv2, mobilenetv3, mobileone, mobilevit  # noqa: F401
