"""The steersample studio: a Gradio app that puts plain and steered sampling side by side.

Installed as ``steersample.studio`` (a setuptools ``package-dir`` mapping of ``demos/``), so
``python demos/app.py``, ``python -m steersample.studio.app`` and ``steersample demo`` all start
the same app. Only this package imports gradio; ``import steersample`` never does.

    from steersample.studio.app import build_app
    demo = build_app()                 # the embedded default model
    demo.queue().launch(server_name="127.0.0.1")

Modules: ``settings`` (controls -> validated request, presets), ``engine`` (models, the two
sampling runs), ``render`` (tiles, phase plot, stats), ``downloads`` (JSON report, PNG sheet),
``status`` (what the page says about itself: applied controls, stale results, presets, controls
that cannot act), ``page`` (the Gradio layout and handlers), ``app`` (building and launching).
"""

__all__ = ["build_app", "main"]


def __getattr__(name: str):
    if name in __all__:
        from steersample.studio import app

        return getattr(app, name)
    raise AttributeError(f"module 'steersample.studio' has no attribute {name!r}")
