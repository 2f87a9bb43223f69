"""One small hook per component kind, in the spirit of simonw/llm's ``register_models``.

Each hook receives ``register(name, factory)``. The factory's keyword parameters, with type
hints and defaults, are the recipe keys; positional-only parameters are what the engine passes
(see docs/plugins.md for each kind's context).
"""

import pluggy

PROJECT = "fer"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

#: kind name → hook name; the order is the order `fer plugins` lists them in
KINDS: dict[str, str] = {
    "dataset": "register_datasets",
    "backbone": "register_backbones",
    "head": "register_heads",
    "loss": "register_losses",
    "optimizer": "register_optimizers",
    "scheduler": "register_schedulers",
    "augmenter": "register_augmenters",
    "batch_transform": "register_batch_transforms",
    "sampler": "register_samplers",
    "tta": "register_tta",
    "callback": "register_callbacks",
    "ensembler": "register_ensemblers",
    "tuner": "register_tuners",
}


class FerSpecs:
    @hookspec
    def register_datasets(self, register):
        """``factory(**params) -> DataSource``"""

    @hookspec
    def register_backbones(self, register):
        """``factory(**params) -> Backbone``"""

    @hookspec
    def register_heads(self, register):
        """``factory(in_features, num_outputs, /, **params) -> nn.Module``"""

    @hookspec
    def register_losses(self, register):
        """``factory(task: TaskInfo, /, **params) -> Loss``"""

    @hookspec
    def register_optimizers(self, register):
        """``factory(param_groups, /, **params) -> torch.optim.Optimizer``"""

    @hookspec
    def register_schedulers(self, register):
        """``factory(optimizer, info: ScheduleInfo, /, **params) -> Scheduler``"""

    @hookspec
    def register_augmenters(self, register):
        """``factory(pre: Preprocessing, /, **params) -> Augmenter``"""

    @hookspec
    def register_batch_transforms(self, register):
        """``factory(task: TaskInfo, info: ScheduleInfo, /, **params) -> callable(batch, epoch) -> batch``"""

    @hookspec
    def register_samplers(self, register):
        """``factory(labels: list[int], task: TaskInfo, /, **params) -> callable(seed) -> torch Sampler``"""

    @hookspec
    def register_tta(self, register):
        """``factory(pre: Preprocessing, /, **params) -> TestTimeAugmentation``"""

    @hookspec
    def register_callbacks(self, register):
        """``factory(**params) -> Callback`` (trackers are callbacks)"""

    @hookspec
    def register_ensemblers(self, register):
        """``factory(**params) -> Ensembler``"""

    @hookspec
    def register_tuners(self, register):
        """``factory(**params) -> Tuner``"""
