"""cvmkd-kd: knowledge distillation for cvmkd: the KD loss, the student and teacher trainers,
and the cache of teacher outputs."""

__version__ = "0.1.0"
