"""The audit log's filters, shared by the page and its CSV export."""

from __future__ import annotations

from typing import Any

from django import forms

from .models import Outcome, Via


class AuditFilterForm(forms.Form):
    """User, action, outcome, door and a date range; a bad value is reported and ignored."""

    user = forms.CharField(required=False, max_length=150, label="User")
    action = forms.CharField(required=False, max_length=32, label="Action")
    outcome = forms.ChoiceField(required=False, choices=[("", "Any outcome"), *Outcome.choices])
    via = forms.ChoiceField(required=False, choices=[("", "Any door"), *Via.choices], label="Via")
    date_from = forms.DateField(required=False, label="From", widget=forms.DateInput(attrs={"type": "date"}))
    date_to = forms.DateField(required=False, label="To", widget=forms.DateInput(attrs={"type": "date"}))

    def clean(self) -> dict[str, Any]:
        data = super().clean()
        if data.get("date_from") and data.get("date_to") and data["date_from"] > data["date_to"]:
            self.add_error("date_to", "is before the From date")
        return data

    def selector_filters(self) -> dict[str, Any]:
        """Keyword arguments for selectors.audit_events from the fields that validated."""
        data = getattr(self, "cleaned_data", {})
        return {
            "username": data.get("user") or "",
            "action": data.get("action") or "",
            "outcome": data.get("outcome") or "",
            "via": data.get("via") or "",
            "since": data.get("date_from"),
            "until": data.get("date_to"),
        }
