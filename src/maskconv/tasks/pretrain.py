"""``maskconv pretrain``: masked-image pretraining (FCMAE / MAE / ConvMAE) on unlabeled images."""
from __future__ import annotations

import torch

from ..commands import training_command
from ..config import Config
from ..data.build import build_transform
from ..engine import dist as D
from ..engine.loop import FitResult, fit
from ..engine.rundir import RunDir
from ..inputs import check_inputs
from ..models import BackboneOnlyCheckpointError, load_checkpoint, save_weights
from ..rebuild import model_kwargs


def run_pretrain(cfg: Config) -> FitResult:
    """Masked-image pretraining of ``cfg.model`` with ``cfg.objective`` on unlabeled images."""
    from ..pretrain import create_objective, save_objective
    from ..pretrain.masking import indexed_masks

    inputs = check_inputs(cfg, "pretrain")  # before any work or file
    info = D.setup(cfg.run.device, cfg.run.dist_timeout_minutes)
    inputs.print_notes(info.is_main)
    torch.manual_seed(cfg.run.seed)
    ob = cfg.objective
    ob_kw = dict(mask_ratio=ob.mask_ratio, decoder_dim=ob.decoder_dim, decoder_depth=ob.decoder_depth,
                 norm_pix_loss=ob.norm_pix_loss, sparse=ob.sparse)
    obj = create_objective(ob.name, model=cfg.model.name, model_kwargs=model_kwargs(cfg),
                           **{k: v for k, v in ob_kw.items() if v is not None})  # None: the objective's default
    if cfg.model.init:  # continue pretraining: a whole objective, or encoder weights in any layout
        try:
            load_checkpoint(obj, cfg.model.init)
        except BackboneOnlyCheckpointError as whole_err:  # only then is the encoder the right target: a whole
            try:  # objective that fails for its own reason (a shape, NaN) is that error, never read encoder-only
                load_checkpoint(obj.encoder, cfg.model.init)
            except ValueError as enc_err:  # say both
                raise ValueError(f"{cfg.model.init} loads neither as a whole {ob.name} objective ({whole_err}) nor as "
                                 f"encoder weights ({enc_err})") from enc_err
    ds = inputs.train
    tf = build_transform(cfg.data, cfg.model.in_chans, train=True, weak=True)

    def loss_fn(m, x, y, keys=None):
        """Masks from each sample's (seed, epoch, global index): N processes draw exactly one process's masks."""
        if keys is None:  # (SNIP's scoring batch) the objective draws its own
            return m(x).loss
        h, w = obj.grid(x)
        return m(x, mask=indexed_masks(keys[0], keys[1], cfg.run.seed, h, w, obj.mask_ratio, x.device),
                 drawn=True).loss  # drawn at the objective's ratio: not read back (no host sync per step)

    res = fit(cfg, obj, ds, tf, loss_fn, task="pretrain", info=info, keyed_loss=True)
    if info.is_main:
        full = res.state_dict if res.state_dict is not None else obj.state_dict()
        save_objective(obj, res.out / RunDir.OBJECTIVE, full)  # encoder + decoder + config
        enc = {k[len("encoder."):]: v for k, v in full.items() if k.startswith("encoder.")}
        save_weights(enc, res.out / RunDir.ENCODER,  # strict-loads into create_model / timm
                     metadata={"architecture": cfg.model.name})
        print(f"weights: {res.out / RunDir.ENCODER} (encoder), {res.out / RunDir.OBJECTIVE} (all)")
    res.run.release()
    return res


COMMAND = training_command("pretrain", "masked-image pretraining (FCMAE / MAE / ConvMAE) on unlabeled images",
                           run_pretrain)
