"""The pyfunc model file: MLflow stores this file with the model and runs it on load ("models from code"), so
the classifier is rebuilt from kennel's code instead of being unpickled."""

from mlflow.models import set_model

from kennel.track.serving import ImageClassifier

set_model(ImageClassifier())
