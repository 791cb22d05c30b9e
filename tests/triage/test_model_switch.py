"""Switching which triage model versions serve: candidates calibrated and signed off
before they go live, the switch itself audited, in the command and the admin. Real
PostgreSQL, real MIAS films, real (small, untrained) torch models."""

from __future__ import annotations

import pytest
from django.core.management import CommandError
from django.urls import reverse

from access.models import AuditEvent
from tests.triage.test_exam_score import register_detector, run
from triage import selectors, services
from triage.models import OperatingPoint, TriageAudit, TriageModelVersion

pytestmark = pytest.mark.django_db


def status(name: str) -> str:
    return TriageModelVersion.objects.get(name=name).status


def test_activate_and_retire_are_audited_and_keep_one_active_version_per_kind() -> None:
    live = register_detector(name="live", seed=0)
    candidate = register_detector(name="candidate", seed=5, activate=False)
    assert (live.status, candidate.status) == ("active", "ready")

    services.triage_model_activate(version=candidate, via="command")
    assert (status("live"), status("candidate")) == ("retired", "active")
    first, switch = TriageAudit.objects.filter(action=TriageAudit.Action.MODEL).order_by("pk")
    assert first.before == {"active": None, "operating_point": None} and first.after["version"] == "live"
    assert switch.note == "activated" and switch.before == {"active": "live", "operating_point": None}
    assert switch.after == {
        "kind": "detector",
        "version": "candidate",
        "status": "active",
        "via": "command",
        "operating_point": None,  # none signed off: studies wait as pending
    }
    event = AuditEvent.objects.get(action="triage.model.activate", target="candidate")
    assert event.via == "command" and event.details["before_active"] == "live"

    audits = TriageAudit.objects.count()
    services.triage_model_activate(version=TriageModelVersion.objects.get(name="candidate"))  # already active
    assert TriageAudit.objects.count() == audits  # nothing changed, nothing audited

    services.triage_model_activate(version=TriageModelVersion.objects.get(name="live"))  # a rollback
    assert (status("live"), status("candidate")) == ("active", "retired")

    services.triage_model_retire(version=TriageModelVersion.objects.get(name="live"))
    assert not TriageModelVersion.objects.filter(status="active").exists()
    assert services.active_triage_model("detector") is None  # studies needing it wait as pending
    assert TriageAudit.objects.filter(action="model", note="retired").count() == 1
    assert AuditEvent.objects.filter(action="triage.model.retire", target="live").count() == 1


def test_the_command_lists_switches_and_refuses_unknown_names() -> None:
    register_detector(name="live", seed=0)
    register_detector(name="candidate", seed=5, activate=False)
    listing = run("triage_model", "list")
    assert "detector   candidate  ready" in listing and "detector   live  active" in listing
    assert "0 signed-off point(s)" in listing
    output = run("triage_model", "activate", "candidate")
    assert "detector candidate: ready → active" in output
    assert (status("live"), status("candidate")) == ("retired", "active")
    assert "is active already: nothing changed" in run("triage_model", "activate", "candidate")
    assert "detector candidate: active → retired" in run("triage_model", "retire", "candidate")
    with pytest.raises(CommandError, match="no triage model version named 'nope'"):
        run("triage_model", "activate", "nope")


def test_a_candidate_calibrated_and_signed_off_before_the_switch_applies_the_moment_it_goes_live(
    pair, admin, django_capture_on_commit_callbacks
) -> None:
    register_detector(name="live", seed=0)
    run("calibrate_triage", "--cohort", "pair", "--sign-off", admin.username)
    on_live = OperatingPoint.objects.get()
    candidate = register_detector(name="candidate", seed=5, activate=False)

    output = run("calibrate_triage", "--cohort", "pair", "--detector", "candidate", "--sign-off", admin.username)
    assert "calibrated on candidate, not active" in output
    on_candidate = OperatingPoint.objects.latest("pk")
    assert list(on_candidate.model_versions.all()) == [candidate] and on_candidate.score_source == "detector"
    # Signed off, but the live detector still serves under its own point.
    assert status("live") == "active" and selectors.signed_off_point() == on_live

    with django_capture_on_commit_callbacks(execute=True):
        services.triage_model_activate(version=candidate)
    assert selectors.signed_off_point() == on_candidate  # no gap without a signed-off point
    assert status("live") == "retired"
    # The switch changed the point triage uses: the audit says from which to which.
    audit = TriageAudit.objects.filter(action=TriageAudit.Action.MODEL).latest("pk")
    assert audit.before == {"active": "live", "operating_point": on_live.pk}
    assert audit.after["operating_point"] == on_candidate.pk
    output = run("triage_model", "retire", "candidate")
    assert "no signed-off operating point applies to the active models: studies wait as pending" in output
    output = run("triage_model", "activate", "live")
    assert f"triage uses operating point {on_live.pk} (detector score, threshold" in output
    with pytest.raises(CommandError, match="live is a detector, not a classifier"):
        run("calibrate_triage", "--cohort", "pair", "--classifier", "live")


def test_the_admin_switches_versions_through_the_service_and_cannot_edit_the_status(admin_client, admin_user) -> None:
    client = admin_client
    register_detector(name="live", seed=0)
    candidate = register_detector(name="candidate", seed=5, activate=False)
    changelist = reverse("admin:triage_triagemodelversion_changelist")
    response = client.post(changelist, {"action": "activate", "_selected_action": [candidate.pk]}, follow=True)
    assert response.status_code == 200 and "Detector candidate is active." in response.content.decode()
    assert (status("live"), status("candidate")) == ("retired", "active")
    event = AuditEvent.objects.get(action="triage.model.activate", target="candidate")
    assert event.user == admin_user and event.via == "page"
    both = list(TriageModelVersion.objects.values_list("pk", flat=True))
    response = client.post(changelist, {"action": "activate", "_selected_action": both}, follow=True)
    assert "Select exactly one version to activate." in response.content.decode()
    assert status("candidate") == "active"
    # The status is read-only on the change form: no field to post a second active version with.
    form = client.get(reverse("admin:triage_triagemodelversion_change", args=[candidate.pk])).content.decode()
    assert 'name="status"' not in form
    response = client.post(changelist, {"action": "retire", "_selected_action": both}, follow=True)
    assert "Retired: candidate." in response.content.decode()
    assert not TriageModelVersion.objects.filter(status="active").exists()
