"""The stages of one retraining run (:func:`model_store.pipeline.retrain`), in order.

Each stage is a function returning a small dataclass that the next stages read (keras-io's linear
transfer-learning workflow; ``retrain.py``'s ``main()`` cut into named steps)::

    data.take_snapshot        -> Snapshot     the labelled images and their hash split
    data.compute_bottlenecks  -> Bottlenecks  cached backbone features of the readable images
    data.make_split           -> Split        training / validation / test masks
    data.train                -> Trained      the softmax head
    gate.evaluate_head        -> Evaluated    test-split scores, the serving model's on the same images, and
                                              the open-set scorer calibrated on validation (gate.fit_open_set)
    gate.decide_gate          -> Gate         accuracy floor, allowed drop
    version.write_version     -> ModelVersion the version folder (temp name, renamed when complete; openset.npz)
    version.promote_or_refuse -> (status, message)
    data.prune                                old versions, stale bottlenecks, other backbones' caches

:func:`model_store.pipeline._retrain` runs them under the store's training lock.
"""
