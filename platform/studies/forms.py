"""Filter forms the study list and the worklist share."""

from __future__ import annotations

from typing import Any

from django import forms

from . import selectors


class ModalityDateFilterForm(forms.Form):
    """Modality and study-date range from a query string; a bad value is reported and ignored."""

    modality = forms.ChoiceField(required=False)
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Only the modalities the archive holds; an unknown one is reported as ignored.
        self.fields["modality"].choices = [("", "Any modality"), *((m, m) for m in selectors.study_modalities())]

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("date_from") and data.get("date_to") and data["date_from"] > data["date_to"]:
            self.add_error("date_to", "is before the From date")
        return data
