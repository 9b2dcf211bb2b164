"""The hierarchical ensemble (groups S, W, A fused as P_S + alpha P_W + beta P_A), run by
``python pipeline/ensemble.py --search`` and ``--apply``.

The members are exactly those the params define: ``<model>_s<seed>`` of train.models x
train.seeds and of train.students x train.student_seeds (maps of other members under
``oof_preds/`` are ignored, said in one line; a defined member without maps is an error). Their
OOF maps must cover every train frame of folds.csv (``ensemble.allow_partial: true`` fits on
the covered ones and says so in metrics.json and the table), and their meta.json must
record the class names of data/classes.json, in order.

Members (``oof_preds/<model>_s<seed>/``) form three groups: strong S and weak W (members of the
primary family, ranked by OOF mIoU: the top ``n_strong`` are S) and auxiliary A (other
families), or the lists given in ``ensemble.groups``. The fused map is P_S + alpha P_W +
beta P_A (VSPW 2021, 5th place: 57.26 best single -> 58.01 P_S -> 58.50 +W -> 61.10 +A).

``--search`` scores every (alpha, beta) of the grid in one streaming pass over the OOF maps
(:func:`pipeline.ensembling.passes.score_pass`, which also scores the best member and the uniform mean),
then records them in an Optuna study, one complete trial per grid point in grid order; the
study lives in ``<out>/study.journal`` (Optuna's JournalStorage, file backend; weights.json
says how to open it) and resumes. The fused rows of the table (P_S,
P_S + alpha P_W, the best point) need label maps for their video consistency: the grid pass
leaves compact label records (temporary, under ``<out>``) from which they are rebuilt exactly,
on the workers while the study runs, without reading a map again. Members are ranked by the
OOF confusion matrices that inference stores in meta.json ("oof_cm_tta"; checked against the
maps: every member's ground-truth counts, and the best member's matrix in full), or else by a
pass of their own (auto groups) or in the grid pass (explicit groups). A search killed at any
point resumes to the same outputs: the study keeps each grid point once, weights.json comes last.
A study of other inputs is replaced only once the new one is complete (built in a work file
beside it). One search at a time writes ``<out>``: it holds ``<out>/.search.lock``.
Fallback: when the best fused row scores below the best single member OOF,
``ensemble.fallback: best_single`` (the default) makes weights.json select that member alone
(``"fallback": "best_single"``, both scores recorded), so the submission is never worse out of
fold than its best member; ``none`` keeps the fused row with a warning.
Test maps of a member: the mean of its k fold models (the models its OOF maps measured). A
``--fold all`` run (trained on every train frame, no OOF map) is not counted as one more fold
model: it gets the separate weight ``ensemble.full_data_weight`` (default 0: not used) and the
fold models share the rest; each member's ``test_weights`` ({"f0": .., "fall": ..}) are
recorded in weights.json and members.json.
Outputs: ``weights.json`` (groups, alpha, beta, grid, score, input fingerprint),
``metrics.json`` (the ensemble table on OOF: flat ``<row>_mIoU`` / ``_mVC8`` / ``_mVC16`` keys),
``members.json`` (OOF mIoU, family and group of each member), ``heatmap.png`` and
``grid_scores.npz`` (the passes' results, reused while the inputs' fingerprint is unchanged).
``--apply`` fuses the test maps with the saved weights into ``<out>/test_pred/<id>.png``: it
never fits anything on test data. Where test frames have masks, it then scores every member
and row of the table on them with the OOF-fitted weights (``<out>/test_scores.json``, see
:mod:`pipeline.ensembling.holdout`), for the technique ledger.

Where each step lives: the fusion and its scores: fusion (the arithmetic, the table's rows),
gridscore (a whole weight grid scored exactly in one look), records (label records of the grid
pass), passes (streaming passes over the OOF maps). The search: params, inputs, groups, cache,
study (Optuna), lock, fit (passes, study and rows under the lock), documents, outputs, search
(its steps). Then apply (the test maps fused), testmaps (a member's test map) and holdout
(scores on a labelled test split).
"""
