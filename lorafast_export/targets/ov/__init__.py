"""Pieces of the openvino target (see lorafast_export/targets/openvino.py). Import openvino only inside functions."""
