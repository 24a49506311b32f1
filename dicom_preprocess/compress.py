"""Re-encode an uncompressed DICOM slice losslessly in a compressed transfer syntax.

The tests and ``benchmarks/preprocess.py --compressed`` build compressed archives out of real
uncompressed RSNA slices with it, so that every decode path can be checked pixel for pixel against
the original. The header is kept as it is; only the transfer syntax and PixelData change.

Encoders (what each library can write, pydicom 3.0):

* RLE Lossless: pydicom's ``Dataset.compress`` (its own encoder, pylibjpeg-rle or GDCM);
* JPEG-LS lossless: ``Dataset.compress`` with pyjpegls (CharLS);
* JPEG 2000 lossless: ``Dataset.compress`` with pylibjpeg-openjpeg;
* JPEG Lossless SV1 (process 14, selection value 1, the CQ500 kind): pydicom has no encoder for it;
  python-gdcm's ``ImageChangeTransferSyntax`` writes it (from a file: its Python binding reads no
  stream, and an Image built in memory crashes on its reference count when it is released).
"""
from __future__ import annotations

import io
import os
import tempfile
import warnings

from .decoders import JPEG_2000_LOSSLESS, JPEG_LOSSLESS_SV1, JPEG_LS_LOSSLESS, RLE_LOSSLESS

LOSSLESS = {
    "JPEG Lossless SV1": JPEG_LOSSLESS_SV1,
    "JPEG-LS lossless": JPEG_LS_LOSSLESS,
    "JPEG 2000 lossless": JPEG_2000_LOSSLESS,
    "RLE Lossless": RLE_LOSSLESS,
}
_ENCODING_PLUGIN = {JPEG_LS_LOSSLESS: "pyjpegls", JPEG_2000_LOSSLESS: "pylibjpeg", RLE_LOSSLESS: ""}


def compress(raw: bytes, transfer_syntax: str) -> bytes:
    """The DICOM file ``raw`` (uncompressed) with its pixels re-encoded losslessly in
    ``transfer_syntax`` (one of :data:`LOSSLESS`'s values), as the bytes of a DICOM file."""
    import pydicom

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # RSNA's ID_... UIDs
        ds = pydicom.dcmread(io.BytesIO(raw))
        if transfer_syntax == JPEG_LOSSLESS_SV1:
            _gdcm_jpeg_lossless(ds, raw)
        elif transfer_syntax in _ENCODING_PLUGIN:
            ds.compress(transfer_syntax, encoding_plugin=_ENCODING_PLUGIN[transfer_syntax], generate_instance_uid=False)
        else:
            raise ValueError(f"no lossless encoder here for transfer syntax {transfer_syntax}")
        out = io.BytesIO()
        ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def _gdcm_jpeg_lossless(ds, raw: bytes) -> None:
    import gdcm
    import pydicom

    with tempfile.TemporaryDirectory(prefix="medmoco-compress-") as work:
        source, target = os.path.join(work, "in.dcm"), os.path.join(work, "out.dcm")
        with open(source, "wb") as handle:
            handle.write(raw)
        reader = gdcm.ImageReader()
        reader.SetFileName(source)
        if not reader.Read():
            raise ValueError("GDCM cannot read the file")
        change = gdcm.ImageChangeTransferSyntax()
        change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGLosslessProcess14_1))
        change.SetInput(reader.GetImage())
        if not change.Change():
            raise ValueError("GDCM cannot encode the pixels as JPEG Lossless")
        writer = gdcm.ImageWriter()
        writer.SetFile(reader.GetFile())
        writer.SetImage(change.GetOutput())
        writer.SetFileName(target)
        if not writer.Write():
            raise ValueError("GDCM cannot write the file")
        encoded = pydicom.dcmread(target)
    ds.file_meta.TransferSyntaxUID = pydicom.uid.UID(JPEG_LOSSLESS_SV1)
    ds.PixelData = encoded.PixelData  # encapsulated: the Basic Offset Table item and the fragments
    ds["PixelData"].VR = "OB"
    ds["PixelData"].is_undefined_length = True
