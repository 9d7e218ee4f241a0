"""Prometheus metrics of one core. A registry per core (no global state), rendered at ``/metrics``."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.submitted = Counter("skyport_jobs_submitted", "Jobs accepted", registry=self.registry)
        self.rejected = Counter(
            "skyport_submissions_rejected", "Submissions refused as invalid", registry=self.registry
        )
        self.finished = Counter(
            "skyport_jobs_finished", "Jobs that reached a final state", ["state"], registry=self.registry
        )
        self.submit_latency = Histogram(
            "skyport_submit_latency_seconds",
            "Time to accept a submission durably",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scheduling_latency = Histogram(
            "skyport_scheduling_latency_seconds",
            "Time from submission to placement",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.scheduler_pass = Histogram(
            "skyport_scheduler_pass_seconds",
            "Duration of one scheduler pass",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.jobs = Gauge("skyport_jobs", "Jobs by state", ["state"], registry=self.registry)

    def render(self, jobs_by_state: dict[str, int]) -> bytes:
        from skyport.models import JobState

        for state in JobState:
            self.jobs.labels(state=state.value).set(jobs_by_state.get(state.value, 0))
        return generate_latest(self.registry)
