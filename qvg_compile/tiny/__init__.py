"""The tiny AR video model trained for qvg-compile: model, data, checkpoint, eval and demo.

Submodules are imported on use so that ``import qvg_compile`` stays light.
"""
