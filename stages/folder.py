"""The image folder's layout: written by preprocess, read by every stage after it (data.py).

OUT_DIR/{train,val,test}.csv list `path,label,class_name` rows (path relative to OUT_DIR);
OUT_DIR/classes.json holds the class names in label order, normalization.json the train
split's per-channel mean and std. Torch-free, so that preprocess does not import torch.
"""
CSV_HEADER = ("path", "label", "class_name")
CLASSES_FILE = "classes.json"
NORMALIZATION_FILE = "normalization.json"
# PIL's mode for each channel count a folder (and a model trained on one) may have
MODES = {1: "L", 3: "RGB"}
