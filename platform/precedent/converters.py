"""Path converters shared by every app's URLs.

`<uid:name>` matches a DICOM UID as stored (digits and dots, as ingest checks them), so
a path with anything else (a NUL byte, a quote, a slash) is a 404 before a view runs
or a query is made; DICOMweb's own routes use the same pattern (dicomweb/urls.py).
"""

from django.urls import register_converter

UID_PATTERN = r"[0-9]+(?:\.[0-9]+)*"


class UidConverter:
    regex = UID_PATTERN

    def to_python(self, value: str) -> str:
        return value

    def to_url(self, value: str) -> str:
        return value


register_converter(UidConverter, "uid")
