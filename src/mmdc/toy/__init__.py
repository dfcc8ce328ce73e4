"""The built-in default: a small world of drawn scenes and the toy models that know it.

* :mod:`~mmdc.toy.world`: the synthetic task (scenes, skills, questions, splits);
* :mod:`~mmdc.toy.truth`: the correct option of a written question, from the hidden scene;
* :mod:`~mmdc.toy.vision`: the toy vision tower (LLaVA's CLIP) and its scene objective;
* :mod:`~mmdc.toy.models`: tokenizer, processor and the tiny LLaVAs assembled on the tower;
* :mod:`~mmdc.toy.recipe`: the training stages that give the teacher its skill and the
  student its weaker base;
* :mod:`~mmdc.toy.build`: ``mmdc models build-toy``;
* :mod:`~mmdc.toy.diagnostics`: run diagnostics read from the hidden scenes.

The framework (data, models, stages, the calibration loop) never depends on this package
except to write the synthetic task and to read diagnostics on it.
"""
