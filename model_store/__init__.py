"""labelgram model store: labelled images, bottleneck features, softmax-head training, model versions.

This package never imports ``telegram``; see ``docs/architecture.md`` for the module contract.
"""
