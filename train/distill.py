"""Knowledge distillation as a task wrapper: any zoo model teaches, inside the ordinary training step.

Logit distillation (Hinton et al., arXiv:1503.02531): loss = (1 - alpha) * task loss
+ alpha * T^2 * KL(softmax(teacher / T) || softmax(student / T)). Feature distillation (FitNets, Romero et al.,
arXiv:1412.6550): a learned 1x1 projection maps a named student feature map onto a named teacher map (resized to the
student's spatial size), with a mean-squared error. The teacher runs in inference mode on the same batch, re-normalized
to its own mean/std (and resized when `teacher_image_size` is set); its variables enter the jitted step as arguments.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from train.forward import Forward
from train.tasks import Task


class Distillation(Task):
    def __init__(self, task: Task, teacher, student_cfg, *, temperature: float = 4.0, alpha: float = 0.5,
                 features: tuple[str, ...] = (), feature_weight: float = 1.0,
                 teacher_image_size: int | None = None, seed: int = 0):
        """`teacher` is a `zoo.Model` (module, variables, cfg); `student_cfg` the student's `ModelCfg`."""
        self.task, self.teacher, self.student_cfg = task, teacher, student_cfg
        self.temperature, self.alpha, self.feature_weight = float(temperature), float(alpha), float(feature_weight)
        self.teacher_image_size, self.seed = teacher_image_size, seed
        self.metric_names = tuple(task.metric_names) + ("kd_loss",) + (("feature_loss",) if features else ())
        self.best_metric, self.best_mode = task.best_metric, task.best_mode
        self.pairs = [_pair(f) for f in features]
        s_info = {f.name: f for f in student_cfg.feature_info}
        t_info = {f.name: f for f in teacher.cfg.feature_info}
        for s, t in self.pairs:
            if s not in s_info or t not in t_info:
                raise ValueError(f"distill.features '{s}:{t}': student features are {', '.join(s_info)}; teacher "
                                 f"features are {', '.join(t_info)}")
        self._channels = [(s_info[s].channels, t_info[t].channels) for s, t in self.pairs]
        if teacher.cfg.num_classes != student_cfg.num_classes:
            raise ValueError(f"the teacher ({teacher.cfg.name}) predicts {teacher.cfg.num_classes} classes and the "
                             f"student {student_cfg.num_classes}: logit distillation needs the same classes "
                             "(fine-tune the teacher on this data first)")

    # host side, model adaptation and evaluation: the wrapped task's
    @property
    def kind(self) -> str:
        return self.task.kind

    @property
    def target_keys(self) -> tuple[str, ...]:
        return self.task.target_keys

    def transforms(self, data, model_cfg):
        return self.task.transforms(data, model_cfg)

    def validate(self, source, model_cfg, **kw):
        self.task.validate(source, model_cfg, **kw)

    def collate(self, examples, valid, rng):
        return self.task.collate(examples, valid, rng)

    def adapt(self, module, base, model_cfg):
        return self.task.adapt(module, base, model_cfg)

    def eval_sums(self, forward, batch):
        return self.task.eval_sums(forward, batch)

    def summarize(self, sums):
        return self.task.summarize(sums)

    def host_evaluator(self):
        return self.task.host_evaluator()

    def init_params(self, rng):
        inner = self.task.init_params(rng)
        rs = np.random.default_rng([self.seed, 0xD157])
        adapters = {f"adapter_{i}": {"kernel": jnp.asarray(rs.normal(0, 1 / np.sqrt(cs), (cs, ct)), jnp.float32)}
                    for i, (cs, ct) in enumerate(self._channels)}
        return {**inner, **({"distill": adapters} if adapters else {})}

    def consts(self):
        return {**self.task.consts(), "teacher": self.teacher.variables}

    def _teacher_input(self, x):
        s, t = self.student_cfg, self.teacher.cfg
        if tuple(s.mean) != tuple(t.mean) or tuple(s.std) != tuple(t.std):
            cs, ct = x.shape[-1], t.in_chans
            raw = x * jnp.asarray(s.std[:cs]) + jnp.asarray(s.mean[:cs])
            x = (raw - jnp.asarray(t.mean[:ct])) / jnp.asarray(t.std[:ct])
        if self.teacher_image_size and self.teacher_image_size != x.shape[1]:
            n = self.teacher_image_size
            x = jax.image.resize(x, (x.shape[0], n, n, x.shape[-1]), "bilinear")
        return x

    def loss(self, forward, batch, *, task_params, consts, rng):
        loss, metrics = self.task.loss(forward, batch, task_params=task_params, consts=consts, rng=rng)
        logits = forward.output
        teacher = Forward(self.teacher.module, consts["teacher"]["params"],
                          {k: v for k, v in consts["teacher"].items() if k != "params"}, train=False)
        t_x = self._teacher_input(batch["image"])
        t_logits = jax.lax.stop_gradient(teacher(t_x))
        T = self.temperature
        p_t = jax.nn.softmax(t_logits / T, axis=-1)
        kl = jnp.sum(p_t * (jnp.log(p_t + 1e-12) - jax.nn.log_softmax(logits / T, axis=-1)), axis=-1).mean()
        kd = kl * T * T
        total = (1.0 - self.alpha) * loss + self.alpha * kd
        metrics = {**metrics, "task_loss": loss, "kd_loss": kd}
        if self.pairs:
            # named outputs of both backbones (`features=True`), on the inputs the logits came from
            s_feats = forward.features(batch["image"])
            t_feats = teacher.features(t_x)
            feat = 0.0
            for i, (s, t) in enumerate(self.pairs):
                fs = s_feats[s].astype(jnp.float32)
                ft = jax.lax.stop_gradient(t_feats[t]).astype(jnp.float32)
                if ft.shape[1:3] != fs.shape[1:3]:
                    ft = jax.image.resize(ft, (ft.shape[0], *fs.shape[1:3], ft.shape[-1]), "bilinear")
                proj = fs @ task_params["distill"][f"adapter_{i}"]["kernel"]
                feat = feat + jnp.mean((proj - ft) ** 2)
            metrics["feature_loss"] = feat
            total = total + self.feature_weight * feat
        metrics["loss"] = total
        return total, metrics


def _pair(spec: str) -> tuple[str, str]:
    s, sep, t = spec.partition(":")
    return (s.strip(), (t if sep else s).strip())
