"""Built-in fer plugins; each module is registered through the fer.plugins entry-point group.

Every plugin module is imported at each `fer` start (pluggy reads its hooks; its commands must be
known), so heavy libraries (timm, torchvision, albumentations, cv2, scikit-learn) are imported
inside the functions that use them: `fer --help` or a refused recipe does not pay for them.
"""
