"""Example models for the demo, the tests and `graft diff --model graft.models:vgg16_rnn3`."""

from graft.models.vgg import VGG, tiny_vgg, tiny_vgg_rnn3, vgg16, vgg16_rnn3

__all__ = ["VGG", "vgg16", "vgg16_rnn3", "tiny_vgg", "tiny_vgg_rnn3"]
