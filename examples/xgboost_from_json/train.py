"""Fit a small XGBoost classifier and save it in XGBoost's own JSON format.

Writes model.json, sample.npy (training rows, for the parity check of the
conversion) and holdout.npz (rows and labels the model never saw).
"""

import numpy as np
import xgboost as xgb
from sklearn.datasets import load_breast_cancer
from sklearn.model_selection import train_test_split

x, y = load_breast_cancer(return_X_y=True)
x = x.astype(np.float32)
x_train, x_test, y_train, y_test = train_test_split(x, y, test_size=0.25, random_state=0, stratify=y)
model = xgb.XGBClassifier(n_estimators=30, max_depth=3, learning_rate=0.3)
model.fit(x_train, y_train)
model.save_model("model.json")
np.save("sample.npy", x_train[:100])
np.savez("holdout.npz", x=x_test, y=y_test)
print(f"wrote model.json ({len(x_train)} training rows, {x.shape[1]} features)")
