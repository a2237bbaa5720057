"""The program's data, installed as the package ``explorer_resources``.

``models/demo-*`` are the offline demo models and ``samples/`` the sample images. Read them through
:mod:`explorer.core.resources` (``demo_model_dir``, ``samples_dir``), which finds this folder with
:func:`importlib.resources.files` in a source checkout, an editable install and a wheel alike.
"""
