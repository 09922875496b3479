"""Dense-prediction heads over any maskconv backbone's dense face (``create_model(name, features_only=True)``):
torchvision's Mask R-CNN / Faster R-CNN (``detection.py``), UperNet (``segmentation.py``); training, evaluation
and prediction through the one loop (``task.py``)."""
