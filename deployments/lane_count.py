"""The lane count the Generation deployment's autoscaling policy last settled on, per application, read by the
stage deployments' policy (`deployments/autoscaling.py`). It lives in a module of its own because Serve pickles a
policy's own module by value: state kept there would be one copy per deployment, not shared in the controller."""

TARGETS: dict[str, int] = {}
