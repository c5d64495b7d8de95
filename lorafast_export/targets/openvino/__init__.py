"""Pieces of the openvino target (see lorafast_export/targets/openvino/target.py). Import openvino only inside functions."""
