"""The three PaGoDA stages, each built from the config and, after the teacher, from the export of the stage it starts
from (`chain.StageSpec.start_from`): `teacher.py`, `distill.py`, `grow.py`; `adversarial.py` is the train step that
distillation and growth share.
"""
from pagoda_dist.stages.adversarial import AdversarialStage
from pagoda_dist.stages.distill import build_distill
from pagoda_dist.stages.grow import build_grow
from pagoda_dist.stages.teacher import TeacherStage, build_teacher

__all__ = ["AdversarialStage", "TeacherStage", "build_distill", "build_grow", "build_teacher"]
