r"""Hyperparameters chosen on validation data by ``experiments.tune`` (generated: do not edit by hand).

Regenerate (all methods, then the default config reads this file):

    python -m experiments.tune --config=experiments/configs/default.py

``TUNED[method]`` are the values of the best trial (lowest validation NLL of the BMA at the selected
checkpoint, mean over the tuning seeds); ``RECORDS[method]`` says how each entry was made: the command,
the commit, the tuning seeds (never the reported ones), the trials (complete / pruned), the wall time
on the machine it ran on, the best and the default trial's validation NLL, and the search space.
"""

TUNED = {'bsam': {'learning_rate': 0.3096376288358686, 'rho': 0.017217064522572018, 'weight_decay': 0.0005},
 'fpbma': {'covariance_lr_scale': 0.03351153776072909,
           'learning_rate': 0.03034689176130684,
           'rho': 0.17770577212813934,
           'weight_decay': 0.0001},
 'fpbma_released': {'covariance_lr_scale': 0.011007747205321305,
                    'learning_rate': 0.028715328439941727,
                    'rho': 0.15504862508289244,
                    'weight_decay': 0.0005},
 'fsam': {'learning_rate': 0.03418316526555065, 'rho': 0.022509966472615873, 'weight_decay': 0.0},
 'moped': {'learning_rate': 0.08459126528049378, 'moped_delta': 0.044818326788762804},
 'sam': {'learning_rate': 0.03832216850492789, 'rho': 0.0791729093402154, 'weight_decay': 0.0001},
 'sgd': {'learning_rate': 0.03799360593474698, 'weight_decay': 0.0001},
 'swag': {'learning_rate': 0.032678699952500535, 'weight_decay': 0.0001},
 'vi': {'covariance_lr_scale': 0.18954235408773365,
        'learning_rate': 0.022282920763430435,
        'weight_decay': 0.0001}}

RECORDS = {'bsam': {'command': 'python -m experiments.tune '
                     '--config.tune.methods=fpbma,vi,fpbma_released,sgd,sam,fsam,bsam,moped,swag,fswag,laplace',
          'commit': 'cb31a54',
          'date': '2026-12-01',
          'default_val_nll': 2.3376104831695557,
          'seeds': [100],
          'space': {'learning_rate': ['log_uniform', 0.001, 1.0],
                    'rho': ['log_uniform', 0.01, 0.5],
                    'weight_decay': ['choice', [0.0, 0.0001, 0.0005]]},
          'trial': 6,
          'trials': {'complete': 12, 'pruned': 4},
          'val_nll': 1.3202683925628662,
          'wall_s': 329.6},
 'fpbma': {'command': 'python -m experiments.tune '
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
 'fpbma_released': {'command': 'python -m experiments.tune '
                               '--config.tune.methods=fpbma,vi,fpbma_released,sgd,sam,fsam,bsam,moped,swag,fswag,laplace',
                    'commit': 'cb31a54',
                    'date': '2026-12-01',
                    'default_val_nll': 1.500226378440857,
                    'seeds': [100],
                    'space': {'covariance_lr_scale': ['log_uniform', 0.01, 1.0],
                              'learning_rate': ['log_uniform', 0.001, 0.1],
                              'rho': ['log_uniform', 0.01, 10.0],
                              'weight_decay': ['choice', [0.0, 0.0001, 0.0005]]},
                    'trial': 10,
                    'trials': {'complete': 11, 'pruned': 5},
                    'val_nll': 0.988745391368866,
                    'wall_s': 471.4},
 'fsam': {'command': 'python -m experiments.tune '
                     '--config.tune.methods=fpbma,vi,fpbma_released,sgd,sam,fsam,bsam,moped,swag,fswag,laplace',
          'commit': 'cb31a54',
          'date': '2026-12-01',
          'default_val_nll': 1.3327823877334595,
          'seeds': [100],
          'space': {'learning_rate': ['log_uniform', 0.001, 0.1],
                    'rho': ['log_uniform', 0.01, 0.5],
                    'weight_decay': ['choice', [0.0, 0.0001, 0.0005]]},
          'trial': 13,
          'trials': {'complete': 9, 'pruned': 7},
          'val_nll': 0.7919346690177917,
          'wall_s': 191.3},
 'moped': {'command': 'python -m experiments.tune '
                      '--config.tune.methods=fpbma,vi,fpbma_released,sgd,sam,fsam,bsam,moped,swag,fswag,laplace',
           'commit': 'cb31a54',
           'date': '2026-12-01',
           'default_val_nll': 1.1133078336715698,
           'seeds': [100],
           'space': {'learning_rate': ['log_uniform', 0.001, 0.1], 'moped_delta': ['log_uniform', 0.01, 0.5]},
           'trial': 5,
           'trials': {'complete': 10, 'pruned': 6},
           'val_nll': 0.8224326968193054,
           'wall_s': 174.5},
 'sam': {'command': 'python -m experiments.tune '
                    '--config.tune.methods=fpbma,vi,fpbma_released,sgd,sam,fsam,bsam,moped,swag,fswag,laplace',
         'commit': 'cb31a54',
         'date': '2026-12-01',
         'default_val_nll': 1.3076739311218262,
         'seeds': [100],
         'space': {'learning_rate': ['log_uniform', 0.001, 0.1],
                   'rho': ['log_uniform', 0.01, 0.5],
                   'weight_decay': ['choice', [0.0, 0.0001, 0.0005]]},
         'trial': 3,
         'trials': {'complete': 8, 'pruned': 8},
         'val_nll': 0.9136635661125183,
         'wall_s': 179.1},
 'sgd': {'command': 'python -m experiments.tune '
                    '--config.tune.methods=fpbma,vi,fpbma_released,sgd,sam,fsam,bsam,moped,swag,fswag,laplace',
         'commit': 'cb31a54',
         'date': '2026-12-01',
         'default_val_nll': 1.498620867729187,
         'seeds': [100],
         'space': {'learning_rate': ['log_uniform', 0.001, 0.1],
                   'weight_decay': ['choice', [0.0, 0.0001, 0.0005]]},
         'trial': 13,
         'trials': {'complete': 11, 'pruned': 5},
         'val_nll': 0.8931143283843994,
         'wall_s': 132.3},
 'swag': {'command': 'python -m experiments.tune '
                     '--config.tune.methods=fpbma,vi,fpbma_released,sgd,sam,fsam,bsam,moped,swag,fswag,laplace',
          'commit': 'cb31a54',
          'date': '2026-12-01',
          'default_val_nll': 1.5396679639816284,
          'seeds': [100],
          'space': {'learning_rate': ['log_uniform', 0.001, 0.1],
                    'weight_decay': ['choice', [0.0, 0.0001, 0.0005]]},
          'trial': 15,
          'trials': {'complete': 12, 'pruned': 4},
          'val_nll': 0.8268659710884094,
          'wall_s': 184.7},
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
