import pytest


def pytest_configure(config):
    config.addinivalue_line(
        'markers', 'slow: end-to-end runs (seconds to minutes); still run in CI')


@pytest.fixture(autouse=True)
def mmdet_default_scope():
    """Every test starts in MMDetection's registry scope, whatever scope an
    earlier test's Runner left current (as mmdet's own tests do)."""
    from mmdet.utils import register_all_modules
    register_all_modules(init_default_scope=True)
    import sasa_mmdet  # noqa: F401
