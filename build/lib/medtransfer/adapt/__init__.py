"""Adapting a trained model to a new site without labels (`medtransfer adapt`).

:mod:`~medtransfer.adapt.core` runs it; :mod:`~medtransfer.adapt.images` lists the unlabelled
images; :mod:`~medtransfer.adapt.batchnorm` re-estimates BatchNorm statistics (AdaBN, TENT);
:mod:`~medtransfer.adapt.operating` folds a new class prior into the model and moves its
threshold; :mod:`~medtransfer.adapt.report` prints the outcome. The label-free shift tests and the
prior estimators live one layer down, in :mod:`medtransfer.evaluation` (``site_shift``,
``shift_tests``, ``label_shift``), where `evaluate` uses them too.
"""
