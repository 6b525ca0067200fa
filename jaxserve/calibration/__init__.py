"""Calibration: measuring the real engine so the simulator can model it.

    profile_format  the profile file (PointSpec, ProfilePoint, Profile; load/save, validation)
    grid            the step shapes a profile measures
    plans           hand-built BatchPlans of a shape, and one timed sample on a runner
    fit             the step-time model over StepGeometry work, fitted by NNLS (FitReport)
    jitter          the measured step-time scatter (StepJitter)
    speed           SpeedProbe and DriftCompensatedRunner: machine speed against a profile
    profiler        profile_model(): runs the engine over a grid (imports the engine)
    cli             python -m jaxserve.profile

The first six sit beneath the executors (the simulator's ProfiledCostModel uses them); the
profiler and its CLI run the engine and sit above it. This file imports none of them, so
importing one never pulls in the engine.
"""
