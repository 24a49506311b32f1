"""Non-identifying acquisition metadata kept per slice for subgroup analyses.

A model's figures can differ between scanners, reconstruction kernels and slice thicknesses;
a reader asks for them per subgroup. These five tags say how an image was acquired and name no
person: ``Manufacturer``, ``ManufacturerModelName``, ``SliceThickness`` (mm), ``ConvolutionKernel``
and ``KVP``. They are kept in the manifest as text (empty when absent; a multi-valued kernel
joined with ``\\``, as it is stored).
"""
from __future__ import annotations

ACQUISITION_TAGS = ("Manufacturer", "ManufacturerModelName", "SliceThickness", "ConvolutionKernel", "KVP")
# manifest column of each tag
COLUMNS = {"Manufacturer": "manufacturer", "ManufacturerModelName": "manufacturer_model",
           "SliceThickness": "slice_thickness", "ConvolutionKernel": "convolution_kernel", "KVP": "kvp"}


def acquisition(ds) -> dict:
    """``{manifest column: text}`` of :data:`ACQUISITION_TAGS` of a pydicom ``Dataset`` (or the
    reader's fast header view of one)."""
    out = {}
    for keyword in ACQUISITION_TAGS:
        value = ds.get(keyword, None)
        if value is None:
            text = ""
        elif isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
            text = "\\".join(str(v).strip() for v in value)
        else:
            text = str(value).strip()
        out[COLUMNS[keyword]] = text
    return out
