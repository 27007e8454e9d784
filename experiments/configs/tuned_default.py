r"""Hyperparameters chosen on validation data by ``experiments.tune`` (generated: do not edit by hand).

Regenerate (all methods, then the default config reads this file):

    python -m experiments.tune --config=experiments/configs/default.py

``TUNED[method]`` are the values of the best trial (lowest validation NLL of the BMA at the selected
checkpoint, mean over the tuning seeds); ``RECORDS[method]`` says how each entry was made: the command,
the commit, the tuning seeds (never the reported ones), the trials (complete / pruned), the wall time
on the machine it ran on, the best and the default trial's validation NLL, and the search space.
"""

TUNED = {'fpbma': {'covariance_lr_scale': 0.03351153776072909,
           'learning_rate': 0.03034689176130684,
           'rho': 0.17770577212813934,
           'weight_decay': 0.0001},
 'vi': {'covariance_lr_scale': 0.18954235408773365,
        'learning_rate': 0.022282920763430435,
        'weight_decay': 0.0001}}

RECORDS = {'fpbma': {'command': 'python -m experiments.tune '
                      '--config.tune.methods=fpbma,vi,fpbma_released,sgd,sam,fsam,bsam,moped,swag,fswag,laplace',
           'commit': 'cb31a54',
           'date': '2026-12-01',
           'default_val_nll': 1.5266616344451904,
           'seeds': [100],
           'space': {'covariance_lr_scale': ['log_uniform', 0.01, 1.0],
                     'learning_rate': ['log_uniform', 0.001, 0.1],
                     'rho': ['log_uniform', 0.01, 10.0],
                     'weight_decay': ['choice', [0.0, 0.0001, 0.0005]]},
           'trial': 13,
           'trials': {'complete': 10, 'pruned': 6},
           'val_nll': 0.986405611038208,
           'wall_s': 415.4},
 'vi': {'command': 'python -m experiments.tune '
                   '--config.tune.methods=fpbma,vi,fpbma_released,sgd,sam,fsam,bsam,moped,swag,fswag,laplace',
        'commit': 'cb31a54',
        'date': '2026-12-01',
        'default_val_nll': 1.5260823965072632,
        'seeds': [100],
        'space': {'covariance_lr_scale': ['log_uniform', 0.01, 1.0],
                  'learning_rate': ['log_uniform', 0.001, 0.1],
                  'weight_decay': ['choice', [0.0, 0.0001, 0.0005]]},
        'trial': 12,
        'trials': {'complete': 7, 'pruned': 9},
        'val_nll': 1.0749232769012451,
        'wall_s': 159.4}}


def apply(config):
    """Sets ``config.hparams.<method>.<name>`` to the tuned values (methods the config has)."""
    for method, values in TUNED.items():
        if method in config.hparams:
            for name, value in values.items():
                config.hparams[method][name] = value
    return config
