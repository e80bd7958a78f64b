"""The embedded demos behind ``gradstore demo``: nothing downloaded, fixed seeds.

Modules:
    digits  an MLP on scikit-learn's bundled digits, logged with ``GradientLogger.capture()`` (the default demo)
    lm      a tiny GPT-2 trained by the HF ``Trainer`` with ``GradstoreTrainerCallback`` on planted facts
"""
