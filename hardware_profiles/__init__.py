"""Hardware profiles: what one model replica gets (accelerator, CPUs, memory) and what it costs.

Profiles are validated data, one YAML file per profile, referenced by name from the model catalog.
"""

from hardware_profiles.loader import default_catalog_dir, load_profiles
from hardware_profiles.schema import Accelerator, HardwareProfile, PricePoint, ProfileCatalog, off_gpu_nodes

__all__ = [
    "Accelerator",
    "HardwareProfile",
    "PricePoint",
    "ProfileCatalog",
    "default_catalog_dir",
    "load_profiles",
    "off_gpu_nodes",
]
