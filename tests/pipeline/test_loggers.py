"""W&B logging works offline: the resolved config and the metrics land in the local run files."""

import time

from vision.utils import train

QUICK = ["trainer.accelerator=cpu", "data.num_workers=0", "callbacks.rich_progress_bar=null",
         "data.train_subset=64", "data.batch_size=16", "trainer.max_epochs=1", "trainer.limit_val_batches=2",
         "trainer.limit_test_batches=2"]


def test_wandb_logger_offline_experiment(tmp_path):
    # Guards the Lightning/W&B seam (WandbLogger.experiment imports W&B internals at run time).
    from lightning.pytorch.loggers import WandbLogger

    logger = WandbLogger(save_dir=str(tmp_path), offline=True, project="test")
    run = logger.experiment
    assert run is not None and run.id
    run.finish()


def test_train_logs_config_and_metrics_to_wandb(compose_cfg, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    cfg = compose_cfg("train", [*QUICK, "logger=wandb", "logger.wandb.log_model=true"])
    _, objects = train(cfg)
    run = objects["trainer"].logger.experiment
    assert run.config["model"]["backbone"]["name"] == cfg.model.backbone.name  # the resolved Hydra config
    assert run.config["model"]["lr"] == cfg.model.lr
    assert run.config["model/params/total"] > 0
    # offline runs keep everything in one local transaction log, to be uploaded by `wandb sync`
    # (W&B's service process may still be flushing it when finish() returns on a loaded machine)
    (log,) = (tmp_path / "wandb").glob("offline-run-*/run-*.wandb")
    keys = (b"train/loss", b"val/acc_best", b"test/acc")
    deadline = time.monotonic() + 60
    while not all(key in log.read_bytes() for key in keys) and time.monotonic() < deadline:
        time.sleep(0.5)
    records = log.read_bytes()
    for key in keys:
        assert key in records
